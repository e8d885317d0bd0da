"""Memory held by three models that share their text encoder and VAE (as fine-tunes of one
base do): with component sharing on, over off. Counts parameter and buffer bytes, each
storage once.

    python benchmarks/bench_shared_components.py
"""

from __future__ import annotations

from common import tiny_models

from multifusion.loading import held_bytes, load_models


def main() -> None:
    paths = tiny_models([("a", 0), ("b", 1), ("c", 2)])
    shared = load_models(paths)
    separate = load_models(paths, share=False)
    one = shared[0]
    sizes = {k: sum(p.numel() * p.element_size() for p in getattr(one, k).parameters()) for k in ("unet", "text_encoder", "vae")}
    print("component bytes of one model: " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in sizes.items()))
    print(f"three models, sharing off: {held_bytes(separate) / 1e6:.3f} MB")
    print(f"three models, sharing on:  {held_bytes(shared) / 1e6:.3f} MB")
    print(f"ratio on / off = {held_bytes(shared) / held_bytes(separate):.3f}")
    sd = {"unet": 3438e6, "text_encoder": 492e6, "vae": 335e6}  # SD 1.5 fp32 bytes, from its configs
    print(
        f"same arithmetic for three SD-1.5 fine-tunes in fp32: {(3 * sd['unet'] + sd['text_encoder'] + sd['vae']) / (3 * sum(sd.values())):.3f}"
    )


if __name__ == "__main__":
    main()
