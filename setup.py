"""Build hook for the optional C accelerator; all metadata lives in setup.cfg.

``facerec_tf.data._fastrec`` speeds up the ``.rec`` -> TFRecord converter's per-record loops
(reads, Example framing, CRC-32C). It is optional: where no C compiler is available the
build skips it and the converter uses its pure-Python path, which writes the same bytes.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "facerec_tf.data._fastrec",
            ["facerec_tf/data/_fastrec.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wno-unused-function"],
            optional=True,
        )
    ]
)
