#!/usr/bin/env escript
%% The OTP side of the differential test (../otp_differential.rs): runs each
%% scenario of a term file on OTP's own `supervisor` and prints its canonical
%% trace. Usage: escript runner.erl SCENARIOS.terms
%%
%% Trace lines, the same as the Rust runner's:
%%   start PATH              a child (or supervisor) began its init
%%   exit PATH CLASS         it ended: normal | shutdown | killed | crash
%%   ctl OP PATH RESULT      a terminate/restart/delete/start_child answer
%%   start_link ok|error     the root's start returned
%%   stop                    the runner stops the root (if it still runs)
%%
%% Order: workers trap exits and report their own start and end with a
%% synchronous call to the tracer before doing anything the supervisor can
%% see, so those lines are in the supervisor's causal order. A process that
%% cannot report (killed, or a supervisor) is seen through the tracer's
%% monitor; before logging anything the tracer first logs every monitored
%% process that is already dead, so such an exit is never logged after
%% something it caused.
-module(runner).
-behaviour(supervisor).
-mode(compile).
-export([main/1, init/1, start_worker/3, start_worker/4, start_sup/3, worker_init/4]).

main([File]) ->
    %% Crash and supervisor reports would bury the traces.
    logger:set_primary_config(level, none),
    {ok, Scenarios} = file:consult(File),
    Self = self(),
    %% Scenarios are independent trees: run them side by side.
    [spawn(fun() -> Self ! {done, Name, run(S)} end) || #{name := Name} = S <- Scenarios],
    Results = [receive {done, Name, Lines} -> {Name, Lines} end || #{name := Name} <- Scenarios],
    lists:foreach(
      fun({Name, Lines}) ->
              io:format("=== ~s~n", [Name]),
              [io:format("~s~n", [L]) || L <- Lines]
      end, Results),
    halt(0).

%% ---------------------------------------------------------------------------
%% One scenario.

run(#{tree := Tree, script := Script}) ->
    process_flag(trap_exit, true),
    Tracer = spawn_link(fun() -> tracer(#{lines => [], mons => #{}, pids => #{}, starts => #{}}) end),
    case supervisor:start_link(?MODULE, {sup, "", Tree, Tracer}) of
        {ok, Root} ->
            call(Tracer, {line, "start_link ok"}),
            lists:foreach(fun(Step) -> step(string:split(Step, " ", all), Root, Tree, Tracer) end,
                          Script),
            stop(Root, Tracer);
        {error, _} ->
            call(Tracer, {line, "start_link error"})
    end,
    call(Tracer, lines).

%% The parent's way to stop the root: an exit signal, then wait for it. The
%% `stop` line tells the exits it causes from those of an escalation.
stop(Root, Tracer) ->
    case is_process_alive(Root) of
        true ->
            call(Tracer, {line, "stop"}),
            exit(Root, shutdown),
            receive {'EXIT', Root, _} -> ok end;
        false ->
            ok
    end.

step(["wait", Ms], _Root, _Tree, _Tracer) ->
    timer:sleep(list_to_integer(Ms));
step(["stop"], Root, _Tree, Tracer) ->
    stop(Root, Tracer),
    settle();
step([Action, Path], _Root, _Tree, Tracer)
  when Action =:= "crash"; Action =:= "normal"; Action =:= "shutdown" ->
    case call(Tracer, {pid, Path}) of
        undefined -> ok;
        Pid -> Pid ! list_to_atom(Action)
    end,
    settle();
step([Op, SupPath, Name], _Root, Tree, Tracer) ->
    Sup = call(Tracer, {pid, SupPath}),
    Dynamic = maps:get(strategy, find(SupPath, Tree)) =:= dynamic,
    Result =
        try control(Op, Sup, Dynamic, Name, call(Tracer, {pid, SupPath ++ "/" ++ Name})) of
            R -> result(R)
        catch
            exit:_ -> "error not_running"
        end,
    call(Tracer, {line, lists:flatten(["ctl ", Op, " ", SupPath, "/", Name, " ", Result])}),
    settle().

control(_Op, undefined, _Dynamic, _Name, _Child) ->
    exit(noproc);
control("terminate_child", Sup, true, _Name, Child) ->
    case Child of
        undefined -> {error, not_found};
        _ -> supervisor:terminate_child(Sup, Child)
    end;
control("terminate_child", Sup, false, Name, _) ->
    supervisor:terminate_child(Sup, list_to_atom(Name));
control("restart_child", Sup, _, Name, _) ->
    supervisor:restart_child(Sup, list_to_atom(Name));
control("delete_child", Sup, _, Name, _) ->
    supervisor:delete_child(Sup, list_to_atom(Name));
control("start_child", Sup, true, Name, _) ->
    supervisor:start_child(Sup, [Name]).

result(ok) -> "ok";
result({ok, _}) -> "ok";
result({ok, _, _}) -> "ok";
result({error, simple_one_for_one}) -> "error dynamic";
result({error, E}) when E =:= running; E =:= restarting; E =:= not_found ->
    "error " ++ atom_to_list(E);
result({error, _}) -> "error start_failed".

%% Steps are 100 ms apart: far longer than any reaction, far shorter than
%% the scenarios' timeouts.
settle() -> timer:sleep(100).

%% The scenario node at PATH ("root/mid").
find(Path, Tree) -> find_node(string:split(Path, "/", all), Tree).
find_node([Name], #{name := Name} = Node) -> Node;
find_node([Name, Next | Rest], #{name := Name, children := Children}) ->
    [Child] = [C || #{name := N} = C <- Children, N =:= Next],
    find_node([Next | Rest], Child).

%% ---------------------------------------------------------------------------
%% The tree: supervisors built from the scenario's nodes.

join("", Name) -> Name;
join(Parent, Name) -> Parent ++ "/" ++ Name.

init({sup, ParentPath, #{name := Name} = Node, Tracer}) ->
    Path = join(ParentPath, Name),
    call(Tracer, {start, Path, self()}),
    Flags = #{strategy => strategy(maps:get(strategy, Node)),
              intensity => maps:get(intensity, Node),
              period => maps:get(period, Node),
              auto_shutdown => maps:get(auto_shutdown, Node)},
    Children = case maps:get(strategy, Node) of
                   dynamic ->
                       Template = maps:get(template, Node),
                       [(spec(Path, Template, Tracer))#{
                          id => template,
                          start => {?MODULE, start_worker, [Path, Template, Tracer]}}];
                   _ ->
                       [spec(Path, C, Tracer) || C <- maps:get(children, Node)]
               end,
    {ok, {Flags, Children}}.

strategy(dynamic) -> simple_one_for_one;
strategy(S) -> S.

spec(Path, #{kind := Kind, name := Name} = Node, Tracer) ->
    Start = case Kind of
                worker -> {?MODULE, start_worker, [Path, Node, Tracer]};
                sup -> {?MODULE, start_sup, [Path, Node, Tracer]}
            end,
    #{id => list_to_atom(Name),
      start => Start,
      restart => maps:get(restart, Node),
      shutdown => maps:get(shutdown, Node),
      significant => maps:get(significant, Node),
      type => case Kind of worker -> worker; sup -> supervisor end}.

start_sup(ParentPath, Node, Tracer) ->
    supervisor:start_link(?MODULE, {sup, ParentPath, Node, Tracer}).

%% A dynamic supervisor's start_child(Sup, [Name]) appends the name.
start_worker(ParentPath, Template, Tracer, Name) ->
    start_worker(ParentPath, Template#{name => Name}, Tracer).

start_worker(ParentPath, Node, Tracer) ->
    proc_lib:start_link(?MODULE, worker_init, [self(), ParentPath, Node, Tracer]).

worker_init(Parent, ParentPath, #{name := Name} = Node, Tracer) ->
    Path = join(ParentPath, Name),
    %% Trapping exits lets the worker report its own shutdown (and lets a
    %% stubborn one ignore it).
    process_flag(trap_exit, true),
    N = call(Tracer, {start, Path, self()}),
    case lists:member(N, maps:get(fail_starts, Node)) of
        true ->
            call(Tracer, {exit, Path, crash}),
            exit(crash);
        false ->
            timer:sleep(maps:get(init_ms, Node)),
            proc_lib:init_ack(Parent, {ok, self()}),
            worker(Parent, Path, Node, Tracer)
    end.

worker(Parent, Path, Node, Tracer) ->
    receive
        {'EXIT', Parent, Reason} ->
            case maps:get(stubborn, Node) of
                true ->
                    worker(Parent, Path, Node, Tracer);
                false ->
                    call(Tracer, {exit, Path, class(Reason)}),
                    exit(Reason)
            end;
        crash ->
            call(Tracer, {exit, Path, crash}),
            exit(crash);
        normal ->
            call(Tracer, {exit, Path, normal}),
            exit(normal);
        shutdown ->
            call(Tracer, {exit, Path, shutdown}),
            exit({shutdown, asked})
    end.

class(normal) -> normal;
class(shutdown) -> shutdown;
class({shutdown, _}) -> shutdown;
class(killed) -> killed;
class(_) -> crash.

%% ---------------------------------------------------------------------------
%% The tracer: one ordered log per scenario.

call(Tracer, Msg) ->
    Ref = make_ref(),
    Tracer ! {call, self(), Ref, Msg},
    receive {Ref, Reply} -> Reply end.

tracer(S0) ->
    receive
        {call, From, Ref, Msg} ->
            S1 = flush(S0),
            {Reply, S2} = handle(Msg, From, S1),
            From ! {Ref, Reply},
            tracer(S2);
        {'DOWN', MRef, process, _Pid, Reason} ->
            tracer(down(MRef, Reason, S0))
    end.

handle({start, Path, Pid}, _From, #{mons := Mons, pids := Pids, starts := Starts} = S) ->
    MRef = monitor(process, Pid),
    N = maps:get(Path, Starts, 0) + 1,
    {N, add(["start ", Path],
            S#{mons := Mons#{MRef => {Path, Pid}},
               pids := Pids#{Path => Pid},
               starts := Starts#{Path => N}})};
handle({exit, Path, Class}, From, #{mons := Mons} = S) ->
    %% Reported by the worker itself: its monitor has nothing to add.
    Mons1 = maps:filter(
              fun(MRef, {_, Pid}) when Pid =:= From -> demonitor(MRef, [flush]), false;
                 (_, _) -> true
              end, Mons),
    {ok, add(["exit ", Path, " ", atom_to_list(Class)], S#{mons := Mons1})};
handle({line, Line}, _From, S) ->
    {ok, add(Line, S)};
handle({pid, Path}, _From, #{pids := Pids} = S) ->
    {maps:get(Path, Pids, undefined), S};
handle(lines, _From, #{lines := Lines} = S) ->
    {lists:reverse(Lines), S}.

%% Logs the exits of monitored processes that are already dead, whose
%% 'DOWN' may still be on its way.
flush(#{mons := Mons} = S) ->
    Dead = [MRef || {MRef, {_, Pid}} <- maps:to_list(Mons), not is_process_alive(Pid)],
    lists:foldl(
      fun(MRef, Acc) ->
              receive {'DOWN', MRef, process, _, Reason} -> down(MRef, Reason, Acc) end
      end, S, Dead).

down(MRef, Reason, #{mons := Mons} = S) ->
    case maps:take(MRef, Mons) of
        {{Path, _}, Mons1} ->
            add(["exit ", Path, " ", atom_to_list(class(Reason))], S#{mons := Mons1});
        error ->
            S
    end.

add(Line, #{lines := Lines} = S) ->
    S#{lines := [lists:flatten(Line) | Lines]}.
