"""Neural network modules built on nde's solvers."""

from .neural_ode import NeuralODE

# ---- exports added by the individual model modules below (one line each) ----
from .neural_cde import CDEVectorField, NeuralCDE
from .deq import DEQ, DEQInfo, MonotoneDEQ, MonotoneLinear
from .cnf import CNF
from .neural_sde import CDEDiscriminator, LatentSDE, LipSwish, NeuralSDE, SDEGAN, SDEGenerator
