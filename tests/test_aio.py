"""pdmesh.aio: the service-process helpers every service (gateway, workers, engine core) runs."""
import gc

from pdmesh.aio import freeze_startup_objects


def test_freeze_moves_startup_objects_out_of_full_collections():
    # a worker holds ~220k objects after start-up (torch, the model, the tokenizer); one
    # full collection over them took 120 ms on the dev CPU: every stream of it waited
    keep = [[i] for i in range(50_000)]  # stands in for start-up's long-lived objects
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= len(keep)
        tracked = len(gc.get_objects())  # frozen objects are out of every generation
        assert tracked < gc.get_freeze_count()
    finally:
        gc.unfreeze()
