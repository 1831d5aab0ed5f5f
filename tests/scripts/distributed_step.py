"""One process of a multi-process QLoRA train step on CPU (run by tests/test_distributed.py).

    python distributed_step.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process has 2 CPU devices; the processes meet through `jax.distributed`
(CPU collectives over gloo), build the same model, shard it over a
(data=NUM_PROCESSES, fsdp=2) mesh spanning all of them, and compute the loss
and adapter gradients of one batch, then take one `Trainer` step. Process 0
writes the gathered results to OUT.npz.
"""

import sys
from pathlib import Path

import jax


def main() -> None:
    process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120)

    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    import qlora_jax as qj

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_sharding import TRAIN, _batch, _loss_and_grads, _model

    assert jax.process_count() == num_processes and len(jax.devices()) == 2 * num_processes
    mesh = qj.make_mesh({"data": num_processes, "fsdp": 2})
    model = qj.shard_model(_model(), mesh, "fsdp")
    codes = model.layers.mlp.up_proj.kernel.get_value().codes
    assert not codes.is_fully_addressable and len(codes.addressable_shards) == 2

    loss, grads = _loss_and_grads(model, qj.shard_batch(_batch(), mesh))
    grads = multihost_utils.process_allgather(nnx.to_pure_dict(grads), tiled=True)

    trainer = qj.train.Trainer(_model(), TRAIN)
    qj.shard_model(trainer.model, mesh, "fsdp", optimizer=trainer.optimizer)
    metrics = trainer.train_step(qj.shard_batch(_batch(), mesh))
    adapters = multihost_utils.process_allgather(nnx.to_pure_dict(nnx.state(trainer.model, nnx.LoRAParam)), tiled=True)

    if process_id == 0:
        flat = {"loss": np.asarray(loss), "step_loss": np.asarray(metrics["loss"]),
                "grad_norm": np.asarray(metrics["grad_norm"])}
        for prefix, tree in (("grad", grads), ("adapter", adapters)):
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                flat[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
        np.savez(out, **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
