"""MEMOIR server: ordered fact edits and generation with conditional knowledge activation."""
