"""The model runtime: loader, paged KV cache, scheduler, sampler, engine. Never imports grpc."""
