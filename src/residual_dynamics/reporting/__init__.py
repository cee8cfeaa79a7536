"""Where probe results go: the local results file (``results``), W&B and the reporter that feeds every
sink (``reporter``), and the PNG figures (``figures``)."""
