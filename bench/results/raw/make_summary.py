# Builds bench/results/attention.json from the raw device outputs of runs 1-3 (run from the repo root).
import json, re
R='bench/results/raw/'
r1=json.load(open(R+'attention_run1.json')); r2=json.load(open(R+'attention_run2.json')); r3=json.load(open(R+'attention_run3.json'))
# Rows the run-2 bench printed before its time limit but did not write: recover them from its log.
have={(r['L'],r['pattern'],r['dtype']) for r in r2['rows']}
extra={}
for line in open(R+'bench_run2.log'):
  m=re.match(r'^(\d+) (block_\w+) (\w+) (\S+_ms) (.*)$', line.strip())
  if m and (int(m[1]),m[2],m[3]) not in have:
    v=m[5]; extra.setdefault((int(m[1]),m[2],m[3]),{})[m[4]]=float(v) if not v.startswith('FAIL') else v
for (L,p,dt),d in extra.items():
  r2['rows'].append(dict(L=L,pattern=p,dtype=dt,recovered_from_log=True,**d))
have={(r['L'],r['pattern'],r['dtype']) for r in r3['rows']}
for line in open(R+'bench_run3.log'):
  m=re.match(r'^(\d+) (block_\w+) (\w+) (\S+_ms) (.*)$', line.strip())
  if m and (int(m[1]),m[2],m[3]) not in have:
    r3['rows'].append(dict(L=int(m[1]),pattern=m[2],dtype=m[3],recovered_from_log=True,**{m[4]:float(m[5])}))
    have.add((int(m[1]),m[2],m[3]))
anch=json.load(open('/work/shared/anchors/attn_h100_2026-11-24.json'))
from pallas_kernels import tiling
LAY={680:(1,2,3,4,5,6,8,10,13,16),2240:(1,2,3,4,6,9,13,18,24,32),9451:(1,2,3,4,5,7,9,12,16,21,27,36,48,64)}
def row(run,L,p,dt='bfloat16'):
  for r in run['rows']:
    if r['L']==L and r['pattern']==p and r['dtype']==dt: return r
  return {}
B,H,D=8,16,64
rate3=r3['matmul_tflops_bf16']
summary=[]
for L in (680,2240,9451):
  for p in ('block_diagonal','block_causal'):
    a=[x for x in anch['rows'] if x['L']==L and x['pattern']==p][0]
    el=tiling.touched_tile_elements(LAY[L],p,64)
    floor=el*4*B*H*D/(rate3*1e12)*1e3
    x3,x2,x1=row(r3,L,p),row(r2,L,p),row(r1,L,p)
    fwd=x3.get('triton_auto_fwd_ms')
    if L<4096:
      fb=x3.get('triton_auto_fwdbwd_ms'); fb_src='run3 auto (shipped SHORT_CONFIG)'
    else:
      fb=x2.get('triton_bwd_kv64x64_q64x64_w4_fwdbwd_ms'); fb_src='run2 variant bwd_kv64x64_q64x64_w4: shipped bwd tiles; its fwd used 128x64 tiles with 4 warps, the shipped LONG_CONFIG uses 8 (0.2-0.3 ms faster fwd)'
    base = x2 if 'cudnn_fwd_ms' in x2 else x1
    s=dict(L=L,pattern=p,dtype='bfloat16',ours_fwd_ms=fwd,ours_fwd_source='run3 auto (shipped config)',
           ours_fwdbwd_ms=fb,ours_fwdbwd_source=fb_src,
           tile_floor_fwd_ms=floor,tile_floor_fwdbwd_ms=3.5*floor,fwd_fraction_of_tile_floor=floor/fwd,
           official_fwd_ms_anchor=a['official_fwd_ms'],official_fwdbwd_ms_anchor=a['official_fwdbwd_ms'],
           speedup_fwdbwd_vs_official=a['official_fwdbwd_ms']/fb, speedup_fwd_vs_official=a['official_fwd_ms']/fwd,
           cudnn_fwd_ms=base.get('cudnn_fwd_ms'),cudnn_fwdbwd_ms=base.get('cudnn_fwdbwd_ms'),
           xla_fwd_ms=base.get('xla_fwd_ms'),xla_fwdbwd_ms=base.get('xla_fwdbwd_ms'),
           baselines_source='run2' if base is x2 else 'run1',
           ours_float16_first_config_fwd_ms=row(r2,L,p,'float16').get('triton_default_fwd_ms', row(r1,L,p,'float16').get('triton_default_fwd_ms')),
           ours_float16_first_config_fwdbwd_ms=row(r2,L,p,'float16').get('triton_default_fwdbwd_ms'))
    summary.append(s)
out=dict(
  description="Block-sparse scale attention on one H100 (B8 H16 D64), ms per call. See bench/NOTES_attention.md.",
  device=r3['device'], jax=r3['jax'], jax_triton=r3['jax_triton'], triton=r3['triton'], python=r3['python'],
  date='2026-11-25', timing=r3['timing'],
  matmul_tflops_bf16={'run1':r1['matmul_tflops_bf16'],'run2':r2['matmul_tflops_bf16'],'run3':rate3},
  tokamax=r1.get('tokamax') + " (tokamax 0.0.17 imports xprof, which was not carried)",
  official_same_run="FAIL: the official kernel does not compile on Triton 3.6 (NameError: global RCP_LN2 is not a constexpr; TRITON_ALLOW_NON_CONSTEXPR_GLOBALS=1 would allow it, not retried for lack of device time); official figures are the 2026-11-24 anchors (float16)",
  probe_680_bd_fwd_ms_by_chain=r2.get('probe_680_bd_fwd_ms_by_chain'),
  targets=dict(fwdbwd_2x_official_all=all(s['speedup_fwdbwd_vs_official']>=2 for s in summary),
               fwd_9451_fraction_of_floor={s['pattern']:round(s['fwd_fraction_of_tile_floor'],3) for s in summary if s['L']==9451}),
  summary=summary,
  runs=dict(run1=r1,run2=r2,run3=r3))
json.dump(out,open('bench/results/attention.json','w'),indent=1)
for s in summary:
  print(s['L'],s['pattern'],'fwd %.4f fb %.4f floor %.4f frac %.3f  x_off_fb %.2f x_off_f %.2f cudnn %s/%s xla %s/%s'%(s['ours_fwd_ms'],s['ours_fwdbwd_ms'],s['tile_floor_fwd_ms'],s['fwd_fraction_of_tile_floor'],s['speedup_fwdbwd_vs_official'],s['speedup_fwd_vs_official'],s['cudnn_fwd_ms'],s['cudnn_fwdbwd_ms'],str(s['xla_fwd_ms'])[:8],str(s['xla_fwdbwd_ms'])[:8]), s['ours_float16_first_config_fwd_ms'], s['ours_float16_first_config_fwdbwd_ms'])
print(out['targets'])
