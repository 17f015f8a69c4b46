"""Names shared by the operator, the trainer and the pods they agree on (no heavy imports)."""

from __future__ import annotations

# Where the rendered ConfigMap puts the job inside every trainer pod.
CONFIG_DIR = "/etc/kubetune"
CONFIG_FILE = "job.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"

# Exit code of a trainer pod that was preempted (SIGTERM) after committing a checkpoint:
# the gang can be restarted without counting a failure (75 = EX_TEMPFAIL, "try again").
EXIT_PREEMPTED = 75

# Exit code of a trainer pod that failed on a user error (bad spec, bad data, denied credentials):
# retrying cannot help, so the operator fails the job at once (65 = EX_DATAERR). The one-line
# reason is written to the container termination message.
EXIT_USER_ERROR = 65

# File the trainer writes its one-line failure reason to; the operator sets this variable and the
# container's terminationMessagePath to the same path.
ENV_TERMINATION_MESSAGE_PATH = "KUBETUNE_TERMINATION_MESSAGE_PATH"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"

# torchrun c10d rendezvous port on node rank 0.
RDZV_PORT = 29500

# Labels on every object the operator creates.
LABEL_JOB = "kubetune.io/job"
LABEL_ATTEMPT = "kubetune.io/attempt"
LABEL_RANK = "kubetune.io/rank"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "kubetune"

# Files and switches that pass between the trainer's own processes (supervise or `kubetune run`,
# torchrun, the workers): torchrun does not pass a worker's exit status through.
ENV_PREEMPT_MARKER = "KUBETUNE_PREEMPT_MARKER"  # a worker writes it after a committed SIGTERM save
ENV_USER_ERROR_MARKER = "KUBETUNE_USER_ERROR_MARKER"  # a worker writes its one-line user error here
ENV_RESTART = "KUBETUNE_RESTART"  # "1": the trainer supersedes the run in the output and starts over
ENV_AGENT_PID = "KUBETUNE_AGENT_PID"  # torchrun's pid, for its workers (lifetime.die_with_parent)

# Environment the operator sets in trainer pods.
ENV_ATTEMPT = "KUBETUNE_ATTEMPT"
ENV_JOB_NAME = "KUBETUNE_JOB_NAME"

# Where trainer pods find the job's S3 credentials Secret (keys as files), and the variable naming it.
S3_CREDENTIALS_DIR = "/var/run/secrets/kubetune/s3"
ENV_S3_CREDENTIALS_DIR = "KUBETUNE_S3_CREDENTIALS_DIR"

# The output layout and the cache's environment are declared in kubetune/locations.py; these names
# stay importable from here.
from kubetune.locations import (  # noqa: E402, F401
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    COMMITTED_FILE,
    ENV_CACHE_DIR,
    EVAL_DIR,
    EVAL_PREDICTIONS_FILE,
    EVAL_RESULTS_FILE,
    FINAL_DIR,
    LOSS_PLOT,
    MERGED_DIR,
    METRICS_FILE,
    PROGRESS_FILE,
    TENSORBOARD_DIR,
    TRACKING_FILE,
)
