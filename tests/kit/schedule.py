"""The order in which ``--dist loadgroup`` hands the suite to xdist's workers
(tests/conftest.py pytest_xdist_make_scheduler).

A work unit is one test, except two kinds of groups that must run on one worker:

1. ``vm``: the VM tier's modules (tests/integration/test_vm_*), which boot guests one after
   another on one worker instead of two workers waiting on ``one_guest_at_a_time``;
2. each RADOS module (tests/rados/test_*.py): its tests share the module's fresh pool on the
   worker's Ceph cluster (tests/rados/conftest.py); split over two workers, the module set
   up on both.

Units are handed out longest first (LPT: longest processing time first), from SECONDS,
seconds measured in one ``make pytest`` run (``--durations=0``, 2 shared cores). A long unit
that starts last leaves the other worker idle until it ends; handed out first, the short
ones fill in around it. A unit not in SECONDS counts DEFAULT seconds per test: the table
only needs to be roughly right, and a stale one costs time, never a result.
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT = 0.5

# module path (or "vm") -> {test function name (parameters left out) or "*" (the whole
# module, one unit): seconds}. Tests under 2.5 s are left to DEFAULT.
SECONDS: dict[str, dict[str, float]] = {
    # RADOS modules: seconds on a worker whose cluster is up (tests/rados serially).
    "tests/rados/test_daemon_osd_restart.py": {"*": 24},
    "tests/rados/test_pool.py": {"*": 18},
    "tests/rados/test_daemon_rados.py": {"*": 17},
    "tests/rados/test_store.py": {"*": 14},
    "tests/rados/test_cephkit.py": {"*": 9},
    "tests/rados/test_meta.py": {"*": 9},
    "tests/rados/test_aioread.py": {"*": 5},
    "tests/rados/test_owner.py": {"*": 3},
    "tests/rados/test_prefetch.py": {"*": 2},
    "tests/rados/test_segments.py": {"*": 2},
    "vm": {"*": 72},
    "tests/integration/test_iscsi_clients.py": {"test_libiscsi_conformance_suite": 71},
    "tests/integration/test_space_concurrency.py": {
        "test_overwrites_at_80_percent_of_usable_space_never_fail": 25,
        "test_enospc_bursts_then_freed_space_every_write_is_answered": 23,
        "test_three_volumes_overwritten_with_flushes_no_flush_fails": 12,
    },
    "tests/integration/test_concurrency.py": {
        "test_many_clients_snapshots_restarts": 52,
        "test_pool_clean_command": 4,
    },
    "tests/crash/test_crash.py": {
        "test_crash_during_snapshot_create_delete_rollback_clone": 20,
        "test_crash_states_recover_last_flush": 14,
        "test_crash_concurrent_writers_and_snapshots": 13,
        "test_crash_during_add_device": 4,
    },
    "tests/integration/test_daemon.py": {
        "test_add_device_and_full_warning": 4,
        "test_cli_pool_and_volume_lifecycle": 7,
        "test_unflushed_writes_reach_the_devices_within_the_age_limit": 7,
        "test_sigterm_and_kill9_keep_flushed_data": 4,
        "test_bad_arguments_get_one_clear_line_and_change_nothing": 4,
        "test_snapshots_over_cli_and_nbd": 3,
    },
    "tests/integration/test_qos_daemon.py": {
        "test_settings_checked_stored_and_carried": 7,
        "test_bps_limit_and_volume_top": 7,
        "test_burst_then_limit_with_fio": 7,
        "test_iops_limit_with_fio_and_live_change": 7,
        "test_group_shares_one_limit_and_neighbour_is_not_slowed": 6,
        "test_nbd_and_iscsi_clients_share_one_budget": 6,
        "test_fuse_file_draws_from_the_volume_budget": 6,
    },
    "tests/unit/test_bench_rounds.py": {"test_nbd_smoke_run_writes_the_json": 45},
    "tests/integration/test_wrong_commands.py": {
        "test_wrong_commands_are_one_line_and_change_nothing": 21,
        "test_a_config_with_a_bad_key_is_one_line_and_leaves_the_running_daemon": 7,
    },
    "tests/integration/test_inuse.py": {
        "test_pool_export_and_destroy_refused_while_in_use_until_forced": 9,
        "test_iscsi_session_blocks_delete_until_forced": 8,
        "test_nbd_client_blocks_delete_rename_rollback_until_forced": 5,
        "test_resize_shrink_needs_allow_shrink_and_sizes_can_be_relative": 3,
        "test_incremental_receive_into_a_volume_in_use": 3,
    },
    "tests/integration/test_faults.py": {
        "test_lose_a_device_under_io_replace_it_then_lose_two_more": 5,
        "test_a_member_that_hangs_is_left_out_of_an_import": 4,
        "test_a_hung_member_is_replaced_without_waiting_for_it": 3,
        "test_a_member_whose_writes_hang_is_faulted_and_writes_go_on": 3,
        "test_a_repair_write_that_hangs_does_not_hang_the_read": 3,
        "test_a_lone_device_whose_writes_hang_fails_the_flush": 3,
    },
    "tests/integration/test_owner.py": {
        "test_a_killed_owners_pool_needs_force_and_is_taken_over": 9,
        "test_two_daemons_racing_to_import_one_wins": 7,
        "test_a_stray_import_changes_nothing": 4,
    },
    "tests/property/test_snapshots.py": {"test_snapshot_clone_rollback_program": 17},
    "tests/integration/test_peers.py": {
        "test_hundred_hostile_connections_keep_rss_bounded_and_others_served": 5,
        "test_a_fuse_mount_point_that_cannot_be_used_is_one_line_and_exit_1": 5,
        "test_a_second_daemon_on_the_same_state_dir_or_socket_is_refused": 4,
    },
    "tests/unit/test_write_buffer.py": {
        "test_the_fast_paths_see_the_buffer_after_every_kind_of_writeback": 4,
        "test_dirty_bytes_drop_only_once_the_commit_is_durable": 4,
        "test_old_buffered_writes_are_written_back_and_committed": 3,
        "test_vectored_and_sparse_reads_never_see_later_patches": 3,
    },
    "tests/integration/test_progress.py": {"test_mirror_pool_capacity_progress_and_refusals": 13},
    "tests/unit/test_rebuild.py": {
        "test_crash_during_rebuild_loses_nothing_and_resumes": 10,
        "test_failed_rebuild_writes_release_the_segments_and_keep_the_marks": 3,
    },
    "tests/property/test_write_concurrency.py": {
        "test_model_checker_concurrent_writes_flushes_and_snapshots": 12,
    },
    "tests/integration/test_members.py": {
        "test_members_by_identity_shrink_under_the_daemon_and_replace_by_last_path": 7,
        "test_a_bad_member_at_daemon_start_leaves_its_pool_degraded": 4,
    },
    "tests/integration/test_shared_volume.py": {
        "test_three_connections_share_every_block_of_one_volume": 10,
    },
    "tests/integration/test_prometheus.py": {
        "test_real_prometheus_scrapes_storaged_and_evaluates_the_rules": 10,
    },
    "tests/integration/test_portable_cli.py": {
        "test_stream_frames_of_any_size_and_bad_framing": 7,
        "test_send_receive_pipes_between_pools_incremental_and_resume": 3,
    },
    "tests/integration/test_fuse.py": {
        "test_create_truncate_rename_unlink_match_storagectl": 4,
        "test_ext4_on_a_volume_file_survives_umount_snapshot_and_kill9": 3,
        "test_open_files_block_delete_rename_rollback_until_forced": 3,
    },
    "tests/property/test_volume_model.py": {"test_volume_matches_model_ec": 9},
    "tests/unit/test_space.py": {
        "test_cleaner_keeps_up_with_overwrites_of_ten_times_the_volume": 5,
        "test_freed_space_goes_back_to_sparse_device_files": 4,
    },
    "tests/unit/test_scrub.py": {"test_crash_during_scrub_repair_loses_nothing": 7},
    "tests/integration/test_service.py": {
        "test_notify_watchdog_and_journal_priorities": 4,
        "test_sighup_reloads_live_keys_while_serving": 3,
    },
    "tests/unit/test_pool_tuning.py": {
        "test_two_pools_give_up_a_hanging_member_each_at_its_own_deadline": 6,
    },
    "tests/property/test_sm_snapshots.py": {"test_snapshot_machine::runTest": 6},
    "tests/integration/test_qos_fio.py": {"test_weights_100_300_share_a_saturated_pool": 6},
    "tests/unit/test_nbd_latency_proto.py": {
        "test_many_requests_cut_anywhere_give_the_same_commands": 5,
    },
    "tests/integration/test_cli.py": {"test_cli_conventions_against_the_daemon": 4},
    "tests/unit/test_iscsi_proto.py": {"test_login_fuzz_never_raises": 4},
    "tests/property/test_sm_maps.py": {"test_maps_machine::runTest": 3},
    "tests/integration/test_nbd_unix.py": {"test_nbd_on_a_unix_socket_beside_tcp": 3},
    "tests/integration/test_iscsi_reservations.py": {
        "test_reservations_in_the_daemon_survive_a_restart": 3,
    },
}


def scope(nodeid: str) -> str:
    """The work unit of the test ``nodeid``: ``vm``, a RADOS module's path, or the test."""
    if nodeid.startswith("tests/integration/test_vm_"):
        return "vm"
    if nodeid.startswith("tests/rados/test_"):
        return nodeid.split("::", 1)[0]
    return nodeid


def cost(unit: str, nodeids: Iterable[str]) -> float:
    """The expected seconds of the work unit ``unit`` holding the tests ``nodeids``."""
    whole = SECONDS.get(unit, {}).get("*")
    if whole is not None:
        return whole
    total = 0.0
    for nodeid in nodeids:
        module, _, name = nodeid.partition("::")
        total += SECONDS.get(module, {}).get(name.split("[", 1)[0], DEFAULT)
    return total


def longest_first(units: dict[str, dict[str, bool]]) -> list[str]:
    """The units' names (xdist's work queue: unit -> {nodeid: done}), longest first; units
    of equal cost keep their collection order."""
    return sorted(units, key=lambda u: -cost(u, units[u]))
