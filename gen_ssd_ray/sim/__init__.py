"""Simulated engines and the simulated cluster: scale and fault runs of the real job without GPUs.

- `gen_ssd_ray.sim.profile`: the time and memory constants of a simulated engine (a YAML profile with
  its source stated: conf/sim/cpu.yaml measured here by `gen_ssd_ray.sim.calibrate`, conf/sim/h100.yaml
  derived from published figures) and the compressed clock;
- `gen_ssd_ray.sim.teacher` / `gen_ssd_ray.sim.scorer`: the `sim` teacher and scorer backends, which
  stand behind the unchanged actors (registered in gen_ssd_ray.engines.registry);
- `gen_ssd_ray.sim.faults`: the fault schedule inside engines (dead, hung, slow).

Importing this package is cheap: no torch, vLLM or Ray.
"""
