"""Tensor parallelism for the runtime: gloo on CPU (CI), NCCL on GPUs (rank r on cuda:r,
Triton attention, decode steps under CUDA graphs with the all-reduces inside).

plan.py   which slice of each weight a rank holds (TPPlan)
shard.py  cutting / reading a rank's shards without keeping the full model
comm.py   the process group (TPGroup; gloo on CPU, NCCL on CUDA)
model.py  one rank's decoder (TPCausalLM): the runtime's forward plus collectives
driver.py rank 0 schedules steps, the others follow (Step, TPRunner, greedy_generate)
launch.py start N ranks, run a lead on rank 0 (launch); greedy generation (generate)
lead.py   the runtime's Engine stepping on the ranks (engine_generate)
ranks.py  a worker's ranks: rank 0 in the engine's process as its runner (RankGroup)
follower.py  ranks 1..N-1 of a worker, child processes following rank 0
"""
