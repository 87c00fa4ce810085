"""Wire and data schemas shared by every editrl process.

Nothing here imports torch model code: the reward server depends on this
package and must stay free of the policy.
"""
