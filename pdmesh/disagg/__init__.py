"""The P/D protocol: plain Python over asyncio (no grpc, no torch).

`prefill.PrefillProtocol` is the prefill worker's room machine, `decode.DecodeProtocol`
the decode worker's hold -> Transfer -> adopt with quarantine and peer-gone handling.
Servicers are thin adapters between proto messages and these classes; the classes
talk to the engine through `pdmesh.worker.aio_engine.AsyncEngine` (or a fake) and to
peers and the KV data plane through the small ports in `ports.py`.
"""
