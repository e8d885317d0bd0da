"""Flow-matching transformer families: Stable Diffusion 3.x (`sd3`) and FLUX.1 (`flux`).

Their prediction space (velocity), their schedule (`schedule`: the shifted flow-matching sigmas
behind the shared loop's scheduler contract) and the memory two such models need (`memory`).
The maths and the choice of space are written out in docs/flow.md.
"""
