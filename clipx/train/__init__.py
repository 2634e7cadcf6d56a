"""Training: the loop, optimizer groups, the schedule and checkpoints."""
