"""Benchmarks: python -m leworld.bench <name> [key=value ...]

    sigreg   time and peak memory of SIGReg (forward + backward) over a grid of batch sizes N and
             slice counts M, for leworld's implementation and the naive one, side by side
    collect  environment steps per second (expert policy, rendering included) per worker, at
             several image sizes, with 1 and more worker processes
    sampler  training clips per second from the clip sampler, from memory and from the memory map
    planning world models side by side (LeWM, DINO-WM): time per CEM solve with one environment
             and with many planned in one batch, FLOPs per solve, peak memory, and the ratios;
             with planning.swm=<folder>, a stable-worldmodel LeWM under leworld's CEM and theirs
    train    the training step of model presets (forward, backward, AdamW): clips per second,
             FLOPs per step and model FLOP utilisation against the device's peak, eager and compiled

One module a benchmark (sigreg.py, data.py, planning.py and swm.py, training.py), common.py what they share.
Each prints a markdown table with the machine and the command; docs/benchmarks.md keeps the results.
"""
