"""Typed configuration of the export job (`python -m jobs.export`): the single source of defaults.

Which rows are exported is a registered rule (`ROW_RULES`: name -> what it keeps); an unknown name lists
the options. Locations are local paths or object-store URIs (gen_ssd_ray.common.storage), checked before
anything is read. Knows nothing about Parquet or the generation rows beyond the rules' column names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from gen_ssd_ray.common.config import require
from gen_ssd_ray.common.storage import check_location

# name -> (the column that must be true, what it means). Every rule also needs a conversation
# (`messages` not null: rows with a response).
ROW_RULES: dict[str, tuple[str | None, str]] = {
    "selected": ("selected", "the method's pick for fine-tuning (selected == true)"),
    "correct": ("correct", "verified correct trajectories (correct == true)"),
    "all": (None, "every row"),
}


@dataclass(frozen=True)
class ExportOutputConfig:
    # Folder for data/<split>-NNNNN-of-NNNNN.parquet and README.md (a local path or s3://bucket/prefix).
    dir: str = "outputs/export"
    # Rows per Parquet shard.
    shard_rows: int = 100_000
    # Replace an export the folder already holds (otherwise such a folder is refused).
    force: bool = False


@dataclass(frozen=True)
class ExportConfig:
    PRESET: ClassVar[str] = "conf/export.yaml"

    # Generation output folders (local paths or object-store URIs), read through their manifests.
    inputs: list[str] = field(default_factory=list)
    # Which rows: selected (default), correct or all (see ROW_RULES).
    rows: str = "selected"
    # The dataset's split name (the shards' file prefix and the card's split).
    split: str = "train"
    output: ExportOutputConfig = field(default_factory=ExportOutputConfig)

    def validate(self) -> None:
        """Value checks (ConfigError naming the key and the fix)."""
        require(
            bool(self.inputs),
            "inputs",
            "lists no generation folder; set e.g. inputs=[outputs/generate] (jobs.generate output.dir)",
        )
        for i, path in enumerate(self.inputs):
            check_location(path, f"inputs[{i}]")
        require(
            len(set(self.inputs)) == len(self.inputs), "inputs", f"lists a folder twice: {list(self.inputs)}"
        )
        require(
            self.rows in ROW_RULES,
            "rows",
            f"{self.rows!r} is not registered; use one of {sorted(ROW_RULES)}",
        )
        require(
            self.split.replace("_", "").isalnum(),
            "split",
            f"must be letters, digits or '_' (a file name prefix), got {self.split!r}",
        )
        out = check_location(self.output.dir, "output.dir")
        require(
            out not in {check_location(p, "inputs") for p in self.inputs},
            "output.dir",
            f"is one of the inputs ({out}); export to another folder",
        )
        require(
            self.output.shard_rows >= 1, "output.shard_rows", f"must be >= 1, got {self.output.shard_rows}"
        )
