"""Selection stage: the paper's equations as tensor math, the selectors, and the loss budget."""
