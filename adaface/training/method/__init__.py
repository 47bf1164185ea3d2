"""The AdaFace method's two training stages and their losses: stage 1, face distillation from Arc2Face (paper
§2.2; stage1, distill, synthetic_faces), and stage 2, composition distillation (paper §2.3–2.4; stage2,
composition_step, compositions, composition_losses)."""
