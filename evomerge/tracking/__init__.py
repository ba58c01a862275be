"""MLflow tracking of a search: a parent run per search, a child run per candidate, Pareto plots and tables.

What the store holds
- The parent run (name = the config's name): params = the flattened run config plus `evomerge_version`,
  `git_commit` (when the code is a git checkout), `run_dir`, `config_hash` and the hypervolume reference
  point (`hv_ref`, `hv_ref_rule`); tags `evomerge.run_dir` (how `resume` and `evomerge sync` find the run
  again: the newest parent with that tag), `strategy`, `objectives`; metrics with step = number of
  evaluations (results so far, failed ones included): `hypervolume`, `best/<objective>` (in the score's own
  direction) and `front_size`; artifacts `config.yaml`, `pareto.csv`, `pareto.png`, `parallel.png` (3 or
  more objectives), `progress.png` and `front_recipes.yaml`, refreshed every `artifact_every` results or
  `artifact_seconds` seconds, and at the end.
- A child run per candidate, named `g003-c00012` (generation, id; ` ★` appended while on the front);
  params = the recipe with readable names (`expert_rev.weight`, `lambda`,
  `slices.0.layers0-1.expert_rev.density`) and the genome by gene name (`gene/weight/expert_rev`);
  metrics = the per-task scores, `objective/<name>` (the maximized vector the strategy sees) and
  `eval/seconds`, `eval/forward_passes`, `eval/attempts`; tags `strategy`, `generation`, `parents`,
  `status` (running, ok, failed), `error`, `pareto` (`true`/`false`, re-tagged on exactly the children
  whose membership changed when the front moves) and `evomerge.candidate`.

Where: by default `sqlite:///<run dir>/mlflow.db` (created atomically: MLflow's schema migrations are not
transactional, and a run killed during them would leave a database MLflow cannot open; they run on a temp
file that is linked into place) with artifacts in `<run dir>/mlartifacts` (see it with
`mlflow ui --backend-store-uri sqlite:///runs/x/mlflow.db`); `tracking.uri` names another store (a team
server); the experiment is `tracking.experiment`, else the config's name. A sqlite store keeps its
artifacts in `mlartifacts/` next to the database file (MLflow would otherwise use `./mlruns` of the current
directory); a server keeps them where it is configured to.

Hypervolume reference point r: fixed once per run and recorded (`hv_ref`, `hv_ref_rule`), chosen from the
first 10 successful results in journal order (or all of them when the run has fewer): when all their
scores lie in [0, 1] (accuracies, lm-eval's metrics), r = 0 for a maximized score and -1 for a minimized
one (whose objective is -score), the worst values such scores can take; otherwise r =
`pareto.reference_point` of those points (per-objective minimum minus 1% of the range), and later points
that are not better than r in every objective add nothing. Parent metrics start once r is fixed and cover
every evaluation from the first. r depends on the journal alone, so the live tracker, `evomerge sync` and
`evomerge front --plot` agree.

Never in the search's way: the MLflow work runs in a separate process (`MLflowTracker` starts it; measured on
2 cores with a 60-candidate, 0.2 s-per-candidate search, the same work in a thread of the driver slowed the
search loop by 4-6% through the GIL, the process leaves it unchanged). That process follows the journal, which
the search writes before it calls any observer, so the hooks cost nothing (`on_end` only tells it to flush at
once, overlapping Ray's teardown); it waits until the first result before importing MLflow (~2 s of CPU that
would otherwise compete with the workers' start-up) and runs at nice 19 (Ray's workers run at 15), then
flushes every `flush_seconds`: what arrived since the last flush, coalesced into one `log_batch` per run
holding only what changed (MLflow has no bulk run creation: a new child costs `create_run`, `log_batch` and
`set_terminated`). The first failure (server down, bad URI, disk full) is logged once as a warning; the
process stops writing and records "needs sync" in `<run dir>/tracking.json`; the search goes on. `evomerge
sync RUN_DIR` (`sync`) makes the store match the journal, idempotently: missing parent and children created,
wrong metrics, tags and names fixed, duplicate children removed.
"""

from evomerge.tracking.names import CANDIDATE_TAG, PARENT_TAG, RUN_DIR_TAG, flatten_recipe
from evomerge.tracking.plots import write_plots
from evomerge.tracking.record import Record, load_record
from evomerge.tracking.redact import redact
from evomerge.tracking.store import Store, TrackingError, default_uri, write_artifacts
from evomerge.tracking.sync import sync
from evomerge.tracking.tables import write_tables
from evomerge.tracking.tracker import MLflowTracker

__all__ = [
    "CANDIDATE_TAG",
    "PARENT_TAG",
    "RUN_DIR_TAG",
    "MLflowTracker",
    "Record",
    "Store",
    "TrackingError",
    "default_uri",
    "flatten_recipe",
    "load_record",
    "redact",
    "sync",
    "write_artifacts",
    "write_plots",
    "write_tables",
]
