"""Checkpoint conversion for idefics2-jax: `python -m convert --from hf SRC DST` (see `python -m convert --help`).

The CLI only: the conversion itself is `idefics2_jax.ckpt.convert` (callable from Python too).

`--from` names the source format so that other directions (e.g. `--from orbax --to hf` export) fit the same CLI.
"""

from idefics2_jax.ckpt.convert import ConversionError, Summary, convert_hf_to_orbax, plan_conversion

__all__ = ["ConversionError", "Summary", "convert_hf_to_orbax", "plan_conversion"]
