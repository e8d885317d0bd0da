"""Flow-matching transformer families: Stable Diffusion 3.x (`sd3`) and FLUX.1 (`flux`).

Their prediction space (velocity) and their schedule (`schedule`: the shifted flow-matching
sigmas behind the shared loop's scheduler contract); the memory such models need is
`multifusion.memory`'s, with every other family's.
The maths and the choice of space are written out in docs/flow.md.
"""
