"""Profile test data the profile, policy and operator tests share: a job spec, the team-a profile,
and one case per profile limit (OVER)."""

from __future__ import annotations

from typing import Any

JOB: dict[str, Any] = {
    "model": {"uri": "s3://models/qwen"},
    "dataset": {"uri": "s3://data/alpaca.json"},
    "output": {"uri": "s3://runs/job"},
}
PROFILE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneProfile",
    "metadata": {"name": "team-a"},
    "spec": {
        "defaults": {
            "image": "registry.example/kubetune/trainer:0.2.0",
            "storage": {"s3": {"endpoint": "https://s3.internal", "credentials_secret": "team-a-s3"}},
            "resources": {"gpus": 8, "node_selector": {"pool": "h100"}, "priority_class_name": "team-a",
                          "tolerations": [{"key": "gpu", "operator": "Exists"}]},
            "checkpoint": {"every_steps": 200},
            "active_deadline_seconds": 3600,
        },
        "pod": {
            "image_pull_secrets": ["regcred"],
            "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
            "labels": {"kueue.x-k8s.io/queue-name": "team-a", "team": "a"},
            "runtime_class_name": "nvidia",
        },
        "models": {
            "qwen2.5-7b-instruct": {
                "uri": "s3://models/Qwen2.5-7B-Instruct",
                "target_modules": ".*q_proj|.*v_proj",
                "resources": {"gpus": 2, "memory": "128Gi"},
            }
        },
    },
}  # fmt: skip


# limit -> (its value, job fields that break it, the field named, the message)
OVER = {
    "max_gpus_per_node": (4, {"resources": {"gpus": 8}}, "spec.resources.gpus",
                          "8 GPUs per node exceeds max_gpus_per_node 4 of profile team-a"),
    "max_nodes": (2, {"parallel_config": {"nnodes": 3}}, "spec.parallel_config.nnodes",
                  "3 nodes exceeds max_nodes 2 of profile team-a"),
    "max_total_gpus": (16, {"parallel_config": {"nnodes": 3}}, "spec.resources.gpus",
                       "24 GPUs in all (gpus x nnodes) exceeds max_total_gpus 16 of profile team-a"),
    "max_active_deadline_seconds": (1800, {}, "spec.active_deadline_seconds",
                                    "3600 seconds exceeds max_active_deadline_seconds 1800 of profile team-a"),
    "allowed_image_prefixes": (["registry.example/approved/"], {}, "spec.image",
                               "registry.example/kubetune/trainer:0.2.0 is not allowed by profile team-a "
                               "(allowed_image_prefixes: registry.example/approved/)"),
    "allowed_methods": (["sft", "pretrain"], {"method": "dpo", "dataset": {"uri": "s3://data/p.json"}},
                        "spec.method", "dpo is not allowed by profile team-a (allowed_methods: sft, pretrain)"),
    "allowed_pet_types": (["lora", "qlora"], {"pet_config": {"pet_type": "full"}}, "spec.pet_config.pet_type",
                          "full is not allowed by profile team-a (allowed_pet_types: lora, qlora)"),
    "allowed_service_accounts": (["trainer"], {}, "spec.resources.service_account_name",
                                 "default is not allowed by profile team-a (allowed_service_accounts: trainer)"),
    "allowed_priority_classes": (["team-b"], {}, "spec.resources.priority_class_name",
                                 "team-a is not allowed by profile team-a (allowed_priority_classes: team-b)"),
}  # fmt: skip
