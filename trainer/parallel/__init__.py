"""Several processes: the process group and its collectives (`process_group`), the data-parallel backends that wrap
the policy and step the optimizer (`backends`), and exact-resume checkpoints in each backend's format
(`checkpoint`). docs/distributed.md describes the launch and the invariants."""
