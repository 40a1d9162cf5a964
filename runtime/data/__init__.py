"""Datasets: read Parquet/CSV from any ``pyarrow.fs`` URI, fingerprint all of it, synthesize.

The fingerprint covers every byte of the data (MLflow's dataset digest samples 10k rows and
is not a version).
"""

from runtime.data._io import dataset_fingerprint, list_data_files, read_table, table_fingerprint
from runtime.data._row_groups import Piece, plan_pieces, read_piece, read_pieces
from runtime.data._split import ORDER_KEY, SIDES, split_side, split_unit
from runtime.data._synthetic import SyntheticConfig, generate_synthetic, synthetic_feature_spec
from runtime.data._text import generate_text, load_text_tokens

__all__ = [
    "ORDER_KEY",
    "SIDES",
    "Piece",
    "SyntheticConfig",
    "dataset_fingerprint",
    "generate_synthetic",
    "generate_text",
    "list_data_files",
    "load_text_tokens",
    "plan_pieces",
    "read_piece",
    "read_pieces",
    "read_table",
    "split_side",
    "split_unit",
    "synthetic_feature_spec",
    "table_fingerprint",
]
