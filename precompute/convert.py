"""``eaglecache cache convert``: rewrite a feature cache in this release's layout, or with another codec or
chunk size, without the target.

For caches already written (terabytes of them, at production size): the states are read and written
again bit for bit (bf16 bits in, the same bits out), the parts keep their index and sample range, the
skipped samples stay listed, and the new cache is verified (every array against the checksums taken as
it was written) before it takes the output's name. Only the store settings change:
``precompute.codec``, ``precompute.codec_level`` and ``precompute.chunk_tokens`` of the config given
(null chunk tokens: sized from the hidden size, as precompute sizes it), recorded in the new cache's
metadata in place of the old ones. The new cache is written under a temporary name beside the output
and renamed into place at the end, so an interrupted conversion leaves no cache behind, only the
temporary directory (removed by the next conversion to the same output).
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

from eaglecache.errors import UserError
from eaglecache.formats.cache import default_chunk_tokens
from eaglecache.formats.cache_reader import is_url, open_cache
from eaglecache.precompute.writer import PartWriter, create_or_check_cache

log = logging.getLogger(__name__)

def converted_metadata(metadata: dict[str, Any], precompute) -> dict[str, Any]:
    """``metadata`` with the store settings of the ``precompute`` config section in place of its own."""
    new = copy.deepcopy(metadata)
    chunk = precompute.chunk_tokens or default_chunk_tokens(len(new["aux_layer_ids"]), int(new["hidden_size"]))
    settings = {"codec": precompute.codec, "codec_level": precompute.codec_level, "chunk_tokens": chunk}
    new.update(settings)
    recorded = (new.get("config") or {}).get("precompute")
    if isinstance(recorded, dict):  # the config that made the cache, as it is now stored
        recorded.update({key: value for key, value in settings.items() if key in recorded})
    return new


def _copy(source, path: Path, metadata: dict[str, Any]) -> int:
    """Write every part of ``source`` into a new cache at ``path`` with ``metadata``; the samples written."""
    from tqdm import tqdm

    create_or_check_cache(path, metadata)
    total = sum(shard["num_samples"] for _, record in source.parts for shard in record["shards"])
    with tqdm(total=total, desc="convert", unit="sample", dynamic_ncols=True) as progress:
        for _, record in source.parts:
            sample_range = tuple(record["sample_range"]) if record.get("sample_range") else None
            writer = PartWriter(path, record["part_index"], record["num_parts"], metadata, sample_range)
            for shard in record["shards"]:
                for sample_id in shard["sample_ids"]:
                    sample = source.read(sample_id)
                    writer.add(sample_id, sample.input_ids, sample.loss_mask, sample.aux, sample.final)
                    progress.update()
            for skipped in record["skipped"]:
                writer.skip(skipped["sample_id"], skipped["reason"])
            writer.close(complete=bool(record["complete"]))
    return total


def run_convert(config, cache: str, output: str) -> int:
    from eaglecache.precompute.cache_tools import run_verify

    if is_url(output):
        raise UserError(f"{output}: convert writes local caches only (read from a URL, write to a path)")
    source = open_cache(cache, allow_partial=True)  # an unfinished cache converts to an unfinished one
    if source.fp8:
        raise UserError(f"{cache}: an FP8 cache cannot be converted yet (its states would be quantized twice); "
                        "precompute it again with the settings you want")
    metadata = converted_metadata(source.metadata, config.precompute)
    output_path = Path(output)
    tmp = output_path.with_name(f"{output_path.name}.converting")
    if tmp.exists():
        shutil.rmtree(tmp)  # an earlier conversion to this output that did not finish
    try:
        total = _copy(source, tmp, metadata)
    except BaseException:  # interrupted or failed: no half-written cache stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if run_verify(tmp) != 0:
        raise UserError(f"{tmp}: the converted cache fails verification (kept for inspection)")
    if output_path.exists():  # claimed empty by the command line (an empty directory)
        output_path.rmdir()
    tmp.rename(output_path)
    log.info("converted %s -> %s: %d samples, codec %s level %d, %d tokens/chunk", cache, output, total,
             metadata["codec"], metadata["codec_level"], metadata["chunk_tokens"])
    print(f"{output}: {total} samples in format v2, codec {metadata['codec']} level {metadata['codec_level']}, "
          f"{metadata['chunk_tokens']} tokens/chunk; verified")
    return 0
