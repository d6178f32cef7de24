"""Data-free distillation: the teacher's trajectories and what the student learns from them."""
