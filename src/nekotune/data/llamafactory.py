"""LLaMA-Factory datasets read by the data stage: the files (or hub dataset) of one resolved
dataset_info.json entry (nekotune.llamafactory.resolve_datasets) as nekotune rows."""

from __future__ import annotations

from pathlib import Path

from nekotune.data.sources import Row, read_rows
from nekotune.errors import UserError
from nekotune.llamafactory import LFDataset, convert_row, sample_rows


def read_dataset(ds: LFDataset, max_samples: int | None = None, seed: int = 42) -> list:
    """The dataset's rows as nekotune rows (`nekotune.data.sources.Row`) in `ds.format`, each
    still naming its file and row. num_samples resamples first, then max_samples keeps the
    first rows of this dataset, in LLaMA-Factory's order."""
    if ds.hub == "modelscope":
        raise UserError(f"dataset `{ds.name}` is on ModelScope ({ds.hub_id}); download it (modelscope download "
                        f"--dataset {ds.hub_id}) and point file_name at the files")
    if ds.hub and (ds.subset or ds.folder):
        raise UserError(f"dataset `{ds.name}`: subset/folder of a hub dataset; download it and point file_name at "
                        f"the files")
    if ds.hub:
        rows = read_rows(str(ds.hub_id), split=ds.split)
    else:
        rows = [r for f in ds.files for r in (_read_text(f) if f.suffix.lower() == ".txt" else read_rows(str(f)))]
    if ds.num_samples is not None:
        rows = sample_rows(rows, int(ds.num_samples), seed)
    if max_samples is not None:
        rows = rows[:max_samples]
    return [Row(convert_row(ds, r.data, r.where), r.where) for r in rows]


def _read_text(path: Path) -> list:
    """A .txt dataset is one row per line (`{"text": line}`), as the datasets text builder reads
    it; blank lines separate paragraphs and are not rows."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-save the file as UTF-8") from None
    return [Row({"text": line}, f"{path} line {i}") for i, line in enumerate(lines, start=1) if line.strip()]
