"""Platform layer: fan-outs of science functions over a cluster (Dask, or Dask on Ray).

:func:`qsmrim.fanout.features.extract_cohort` runs :func:`qsmrim.radiomics.tasks.run_chunk` over every
lesion chunk of a cohort and fills the Parquet cache of :mod:`qsmrim.radiomics.cache`;
:mod:`qsmrim.fanout.cli` is its ``qsmrim features`` command. The science packages never import this
package, nor Dask, distributed or Ray. Importing it is cheap: the schedulers load when a fan-out runs.
"""
