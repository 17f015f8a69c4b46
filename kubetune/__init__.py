"""kubetune: fine-tune LLMs on Kubernetes with one FineTuneJob resource."""

__version__ = "0.1.0"
