"""Print the memory table of docs/flow.md: two SD3.5 or FLUX.1 models on 24 and 80 GB GPUs,
counted from the published configs on the meta device (nothing downloaded).

    python benchmarks/flow_memory.py
"""

from multifusion.flow.memory import memory_table

if __name__ == "__main__":
    print(memory_table())
