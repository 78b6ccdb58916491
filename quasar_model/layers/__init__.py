"""Modules of the Quasar-Long decoder: norms, rotary, attention, the three branches, MoE, memories."""
