"""The kubetune operator: reconciles FineTuneJobs into torchrun pod gangs (no torch needed)."""
