"""Numerical methods of nde: Runge--Kutta tableaux and steppers, reversible, SDE and implicit solvers, fixed-point and root solvers."""
