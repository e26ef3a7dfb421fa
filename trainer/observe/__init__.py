"""What a run shows: held-out evaluation per level (`evaluate`), the per-step metrics, eval history, TensorBoard
and console output (`logger`), and plots of one run or a comparison of runs (`plots`)."""
