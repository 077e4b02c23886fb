"""Pruning masks that suppress or amplify memorization (the weight-pruning paper), and BalancedSubnet."""
