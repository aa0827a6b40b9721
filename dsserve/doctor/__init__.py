"""`dsserve doctor`: a pass/fail checklist of the machine, the model folder and the deployment files."""
