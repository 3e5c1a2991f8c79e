"""The row schemas of a meta-dataset (`artifacts/metadataset/`) and of a search history (`--history DIR`): one row
per distilled student (its architecture, encoding, functional embedding and measured accuracy) and one per task
(its teacher's accuracy and embedding). A history row adds where it came from (`PROVENANCE`)."""
from __future__ import annotations

import pyarrow as pa

STUDENT_SCHEMA = pa.schema([
    ("task_id", pa.string()), ("role", pa.string()), ("source", pa.string()), ("teacher_acc", pa.float64()),
    ("arch_json", pa.string()), ("arch_digest", pa.string()), ("encoding", pa.list_(pa.float32())),
    ("flops", pa.int64()), ("params", pa.int64()), ("seed", pa.int64()), ("replicate", pa.int64()),
    ("status", pa.string()), ("reason", pa.string()), ("best_acc", pa.float64()), ("final_acc", pa.float64()),
    ("epochs", pa.int64()), ("wall_s", pa.float64()), ("embedding", pa.binary()), ("code_version", pa.string()),
    ("host", pa.string()),
])

TASK_SCHEMA = pa.schema([
    ("task_id", pa.string()), ("role", pa.string()), ("source", pa.string()), ("num_classes", pa.int64()),
    ("teacher_acc", pa.float64()), ("teacher_digest", pa.string()), ("teacher_embedding", pa.binary()),
    ("embedding_shape", pa.list_(pa.int64())), ("train_wall_s", pa.float64()), ("space_json", pa.string()),
])

# What a search history adds to each student and task row.
PROVENANCE = [("job_id", pa.string()), ("dataset_digest", pa.string()), ("recorded_unix_s", pa.float64())]
HISTORY_STUDENT_SCHEMA = pa.schema(list(STUDENT_SCHEMA) + PROVENANCE)
HISTORY_TASK_SCHEMA = pa.schema(list(TASK_SCHEMA) + PROVENANCE)
