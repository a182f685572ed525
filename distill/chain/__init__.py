"""`python -m distill.chain`: SSLD on a user's own images in one command (`__main__`), and the step runner,
steps and report that `distill.demo` shares with it."""
