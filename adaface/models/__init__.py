"""AdaFace models: expanded CLIP attention, Prompt Inverter, Arc2Face teacher, face encoder, subject prompts."""
