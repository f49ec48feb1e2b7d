"""FireWorks layer: FireTasks (thin shells over :mod:`alflow.campaign`) and workflow builders."""
