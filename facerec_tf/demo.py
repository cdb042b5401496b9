"""Backbone smoke demo: ``python -m facerec_tf.demo [--backbone iresnet50] [--images 8]``.

Builds a backbone, embeds a few synthetic face images and prints the embedding shape and norms.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="iresnet50", help="a name from list_backbones()")
    parser.add_argument("--images", type=int, default=8, help="number of images to embed")
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    from facerec_tf.models import count_parameters, create_backbone, flops

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, 112, 112, 3)).astype(np.float32)
    model = create_backbone(args.backbone)
    start = time.perf_counter()
    emb = model(images, training=False).numpy()
    took = time.perf_counter() - start
    norms = np.linalg.norm(emb, axis=1)
    unit = tf.math.l2_normalize(emb, axis=1).numpy()
    params = count_parameters(model)
    print(f"backbone {model.name}: {params['total']:,} parameters, {flops(model) / 1e9:.2f} GFLOPs")
    print(f"embedded {len(images)} images in {took:.2f} s -> shape {emb.shape}, dtype {emb.dtype}")
    print("raw norms:", np.array2string(norms, precision=2))
    print("L2-normalised norms:", np.array2string(np.linalg.norm(unit, axis=1), precision=4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
