"""The shared feature pipeline: spec, fit, transform, schema and fingerprint.

One implementation serves training (arrow tables) and serving (JSON records)::

    spec = load_spec("features.yaml")
    fp = fit(spec, train_table)                 # state is plain JSON
    x = fp.transform(table)                     # float32 (rows, fp.output_dim)
    x1 = fp.transform_records([{"age": 31, "city": "paris"}])   # same code path
    FittedPreprocessor.from_json(fp.to_json())  # exact round trip

Numeric order of operations: validate -> impute nulls -> clip -> log1p -> standardize,
or bucketize (one-hot) instead of standardize. Categoricals map unseen, infrequent and
null values to the OOV code 0 (column ``name=<oov>``).

This package imports only the standard library, numpy, pyarrow, pyyaml, pydantic and the
bottom of skewless (``runtime.config``, ``runtime.errors``, ``runtime.tasks``), so a serving
image can use it without the training stack.
"""

from runtime.preprocessing._fingerprint import code_fingerprint, package_files, source_fingerprint
from runtime.preprocessing._fit import fit
from runtime.preprocessing._plan import input_schema_of
from runtime.preprocessing._spec import (
    CategoricalFeature,
    FeatureSpec,
    LabelSpec,
    NumericFeature,
    PassthroughFeature,
    load_spec,
)
from runtime.preprocessing._stage import FEATURES, LABEL, features_and_labels, transform_batch, transform_batches
from runtime.preprocessing._transform import FittedPreprocessor

__all__ = [
    "FEATURES",
    "LABEL",
    "CategoricalFeature",
    "FeatureSpec",
    "FittedPreprocessor",
    "LabelSpec",
    "NumericFeature",
    "PassthroughFeature",
    "code_fingerprint",
    "features_and_labels",
    "fit",
    "input_schema_of",
    "load_spec",
    "package_files",
    "source_fingerprint",
    "transform_batch",
    "transform_batches",
]
