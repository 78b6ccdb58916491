"""Subnet neurons: chain, submissions, miner, validator; composes quasar_model, distill and eval."""
