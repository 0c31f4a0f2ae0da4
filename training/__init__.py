"""DeepSpeed training loop shared by continued pretraining and distillation (issues: cpt, distill stages)."""
