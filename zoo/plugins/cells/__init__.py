"""Built-in mLSTM cell backends.

Cell contract (every cell plugin, built-in or third-party; the same as NX-AI's mlstm_kernels)::

    h = cell(q, k, v, i, f, *, c_initial=None, n_initial=None, m_initial=None,
             return_last_states=False, eps=1e-6, **kwargs)
    q, k: (B, NH, S, DQK)   v: (B, NH, S, DV)   i, f: (B, NH, S) gate pre-activations
    h: (B, NH, S, DV);  with return_last_states: (h, (c (B,NH,DQK,DV), n (B,NH,DQK), m (B,NH)))

Queries are scaled by 1/√DQK, keys are not. States are float32 and follow the k-unscaled
convention of xlstm-jax. Registration metadata: ``supports_state``, ``exportable``, ``platforms``,
``sequence_constraint`` and ``kwargs_model``.
"""
