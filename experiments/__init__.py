"""The benchmark's experiments: the job grid (``experiments.grid``), one job's fit, evaluation
and cost (``experiments.job``) and its folder (``experiments.job_folder``), running jobs each in
a fresh process (``experiments.runner``, ``experiments.process``) or as Ray tasks on a cluster
(``experiments.ray_runner``), the ranking
(``experiments.ranking``), choosing a hybrid's members (``experiments.selection``) and the
tiled-inference measurements (``experiments.tiling_measurements``)."""
