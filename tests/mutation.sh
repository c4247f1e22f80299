#!/usr/bin/env bash
# The mutation check (tests/README.md, "Mutation check"): mutmut on the pure core of
# lapi_kv_sync.py, against the fast test files ([tool.mutmut] in pyproject.toml). By hand, never
# in CI. MUTATION_CHILDREN: mutants tested at once (default 1: the machine is shared); MUTATION_NICE:
# its niceness (default 10).
# Any arguments replace the list below (mutmut's own names or globs, e.g. 'lapi_kv_sync.x_merge__mutmut_3').
set -euo pipefail
cd "$(dirname "$0")/.."

# The pure functions, by area. Methods are `ǁClassǁmethod`, as mutmut names them.
functions=(
    parse_go_duration retry_after_seconds http_date                      # durations, dates
    canonical_address expand_range                                       # addresses
    project merge 'ǁSharedǁ__missing__' bulk_item                        # projection, metadata
    make_plan chunks present_keys unsuccessful_keys                      # plan
    encode_record decode_record figures 'ǁRecordǁearliest_expiration'    # the state record
    audit_reason record_after may_be_unchanged record_trusted_until      # when a record stands
    'ǁAnswerDigestǁ__init__' 'ǁAnswerDigestǁpassing' 'ǁAnswerDigestǁhexdigest' lapi_query  # digest
    exposition                                                           # metrics
    load_config valid_port unresolvable                                  # configuration
    table_entry table_end scope_table table_digest make_plan_with_table  # the scope table
    table_item recorded_table table_figures
    unread_variables placeholder                                         # misspelt and unread variables
    proxy_variable parse_proxy no_proxy_entries bypasses_proxy           # proxies, NO_PROXY
    'ǁProxiesǁfor_url' 'ǁProxyǁ__str__'
    refused_by_proxy proxy_refusal lapi_refusal through_proxy_note       # a proxy's own refusal
    record_header record_counts unpacked_record text_lines               # the record, read in bounds
    lapi_batches                                                         # LAPI's junk rows
    snippet quoted redacted escaped_controls rfc3339                     # what messages and logs quote
)
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for f in "${functions[@]}"; do
        case $f in
            ǁ*) names+=("lapi_kv_sync.x${f}__mutmut_*") ;;
            *) names+=("lapi_kv_sync.x_${f}__mutmut_*") ;;
        esac
    done
fi
nice -n "${MUTATION_NICE:-10}" mutmut run --max-children "${MUTATION_CHILDREN:-1}" "${names[@]}"
