"""Dataset-scale likelihoods: image files or an 8-bit tensor -> one CSV row per input.

:func:`score_dataset` scores every input with the probability-flow ODE
(:func:`~diffdensity.likelihood.log_likelihood`, docs/math.md s.3a) after uniform
dequantisation of the 8-bit values into ``[-1, 1]`` and writes one row per input, in
input order (columns and statuses in ``docs/scale.md``).

Reproducible at any scale: dequantisation noise and Hutchinson probes come from a
counter-based generator (:mod:`.keys`) keyed by each image's content and the seed, so
an image's numbers do not depend on its position, its batch, the batch size, the number
of processes or the device. Only
fixed-step solvers are accepted (an adaptive solver picks one step size for the whole
batch, which couples its samples).

Parallel and resumable: under ``torchrun`` each rank scores a strided shard of the
missing samples and appends its rows to its own part file (:mod:`.shards`); rank 0
merges everything into the output. Rows record a content hash and a checksum
(:mod:`.rows`): an interrupted job, a dead rank, a rerun with other inputs or a damaged
results file loses no finished row, keeps no stale or edited one, and recomputes only
what is missing (:mod:`.plan`).

Modules: :mod:`.keys` (random numbers), :mod:`.probes` (per-sample Hutchinson),
:mod:`.inputs` (files and tensors), :mod:`.rows` (columns, hashes, checksums), :mod:`.shards` (result files), :mod:`.distributed`
(process group), :mod:`.accel` (device, autocast, compile, memory), :mod:`.batches`
(per-batch evaluation), :mod:`.plan` (resumption), :mod:`.runner` (the whole run),
:mod:`.result` (what a run did).
"""

from .result import EvaluationResult
from .runner import score_dataset

__all__ = ["score_dataset", "EvaluationResult"]
