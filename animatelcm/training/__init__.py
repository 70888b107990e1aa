"""Training building blocks for decoupled consistency learning (SPEC.md section 3): the consistency-distillation
math (:mod:`.consistency`) and the synthetic moving-shapes video data (:mod:`.synthetic`)."""
