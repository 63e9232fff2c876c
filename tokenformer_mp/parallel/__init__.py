"""Parallelism, kept out of the model's maths: the sharding plan (tensor_parallel), context parallelism, process
groups (megatron-core's), launchers and what builds a rank's model (build)."""
