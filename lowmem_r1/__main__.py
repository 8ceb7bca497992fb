"""`python -m lowmem_r1 ...`: what the launchers run (torchrun / accelerate launch -m lowmem_r1 train RECIPE)."""

from lowmem_r1.cli import main

if __name__ == "__main__":
    main()
