"""Where training runs: devices, distribution, precision and compilation.

- Precision (`train.mixed_precision`; auto: on when a GPU is visible): bfloat16 compute
  where every GPU has it (compute capability >= 8.0, and on CPUs), else float16 with
  dynamic loss scaling (Keras wraps the optimizer when the policy is mixed_float16).
- XLA (`train.xla`; auto: on with one GPU and one replica, as Keras' own rule: it turns
  XLA off under tf.distribute).
- Distribution: `MultiWorkerMirroredStrategy` when the stage runs as several pods (an
  Indexed Job: `Cluster`, derived from the pod's completion index at the edge), else
  `MirroredStrategy` over the local GPUs when there are several. `batch_size` is the
  global batch. Only the chief (worker 0) writes the stage's outputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import keras

from skinlesion import config
from skinlesion.train_cluster import Cluster


@dataclass(frozen=True)
class Runtime:
    strategy: Any
    gpus: int
    precision: str  # the Keras dtype policy: float32 | mixed_float16 | mixed_bfloat16
    jit_compile: bool
    workers: int = 1  # processes training together (multi-worker)
    chief: bool = True  # writes the outputs

    @property
    def mixed_precision(self) -> bool:
        return self.precision != "float32"

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def global_batch(self, batch_size: int) -> int:
        """`batch_size` rounded up to split evenly over the replicas (Keras builds a
        distributed model from the mean of the first batch's per-replica pieces: they must
        have one shape)."""
        return math.ceil(batch_size / self.replicas) * self.replicas


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy `name` for the layers built inside; the previous one after."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def precision_policy(mode: str, capabilities: list[tuple[int, int]]) -> str:
    """The dtype policy for `train.mixed_precision` and the GPUs' compute capabilities."""
    if mode == "off" or (mode == "auto" and not capabilities):
        return "float32"
    if all(cc >= (8, 0) for cc in capabilities):  # Ampere and later, and CPUs: bfloat16
        return "mixed_bfloat16"
    return "mixed_float16"  # with loss scaling


def use_xla(mode: str, gpus: int, replicas: int) -> bool:
    return mode == "on" or (mode == "auto" and gpus > 0 and replicas == 1)


def _capabilities(tf: Any, gpus: list[Any]) -> list[tuple[int, int]]:
    out = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        out.append(tuple(details.get("compute_capability") or (0, 0)))
    return out


@contextlib.contextmanager
def select_runtime(cfg: config.TrainConfig, cluster: Cluster | None = None) -> Iterator[Runtime]:
    """Precision, distribution and compilation from the visible GPUs and the cluster;
    enter before any TF op initialises the GPUs. The dtype policy holds until exit."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised in this process
            tf.config.experimental.set_memory_growth(gpu, True)
    policy = precision_policy(cfg.mixed_precision, _capabilities(tf, gpus))
    with dtype_policy(policy):
        if cluster is not None:
            resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
                tf.train.ClusterSpec({"worker": list(cluster.hosts)}),
                task_type="worker",
                task_id=cluster.index,
                rpc_layer="grpc",
            )
            strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        elif len(gpus) > 1:
            strategy = tf.distribute.MirroredStrategy()
        else:
            strategy = tf.distribute.get_strategy()
        replicas = int(strategy.num_replicas_in_sync)
        yield Runtime(
            strategy=strategy,
            gpus=len(gpus),
            precision=policy,
            jit_compile=use_xla(cfg.xla, len(gpus), replicas),
            workers=len(cluster.hosts) if cluster else 1,
            chief=cluster.chief if cluster else True,
        )


def multi_worker_model(model: Any, strategy: Any) -> Any:
    """Work around Keras 3's fit under MultiWorkerMirroredStrategy (keras-team/keras#20585):
    its symbolic build takes a sample batch by an eager cross-worker reduce, and its metric
    reduce asks for axis 0 of scalars; both fail. The sample batch is the local replica's
    (the same shapes), and scalars are reduced whole. Applied only with several workers."""
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as keras_trainer

    def local(x: Any) -> Any:
        if isinstance(x, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(x)[0]
        return x

    def symbolic_build(iterator: Any = None, data_batch: Any = None) -> None:
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(local, next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = symbolic_build
    original = getattr(
        keras_trainer.reduce_per_replica, "__wrapped__", keras_trainer.reduce_per_replica
    )

    def reduce_per_replica(values: Any, strategy_: Any, reduction: Any) -> Any:
        if reduction in ("mean", "auto") and keras_trainer._collective_all_reduce_multi_worker(
            strategy_
        ):

            def one(v: Any) -> Any:
                if not keras_trainer._is_per_replica_instance(v):
                    return v
                rank = strategy_.experimental_local_results(v)[0].shape.rank
                return strategy_.reduce("MEAN", v, axis=0 if rank else None)

            return tree.map_structure(one, values)
        return original(values, strategy_, reduction)

    reduce_per_replica.__wrapped__ = original  # type: ignore[attr-defined]
    keras_trainer.reduce_per_replica = reduce_per_replica
    return model
